"""The mmserve command line: composes the API and the workers."""
