"""Stage tasks: read files, call the core, write files. Run as `python -m tasks.<stage>`."""
