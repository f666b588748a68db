"""Leaf utilities every layer may use (no other megafusion imports), e.g. atomic file and directory writes."""
