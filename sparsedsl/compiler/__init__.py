"""The compiler: patterns to attention modules, plans and their explanation."""
