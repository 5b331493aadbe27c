"""The built-in samplers of invdiff, each one module, registered through entry points like any plugin."""
