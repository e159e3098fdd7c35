"""Keypoint correspondence on the SPair-71k layout (METHODS.md 6b): reader, matcher, PCK, pictures, protocol."""
