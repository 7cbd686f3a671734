"""One parser per format; each takes (data, filename) and returns a ParsedDocument or raises IngestError."""
