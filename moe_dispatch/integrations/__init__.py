"""Bridges to other libraries. Each submodule imports its library only when used, so
importing moe_dispatch never imports them."""
