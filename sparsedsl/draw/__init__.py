"""Drawing patterns: terminal tile maps, images and expression diagrams."""
