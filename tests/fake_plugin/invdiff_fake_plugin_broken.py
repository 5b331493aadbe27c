"""A plugin that fails at import: invdiff must report it and keep the other samplers."""

raise ImportError("this plugin needs a package that is not installed (on purpose)")
