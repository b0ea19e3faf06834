"""The pattern language: nodes, constructors and the text form."""
