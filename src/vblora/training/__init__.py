"""Training from the command line: settings, the loop, run folders and the packaged corpora."""
