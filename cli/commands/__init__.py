"""One module per command; ``cli.app`` registers them."""
