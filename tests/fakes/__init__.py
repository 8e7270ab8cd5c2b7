"""Fakes: real implementations of the interfaces the code under test talks to."""
