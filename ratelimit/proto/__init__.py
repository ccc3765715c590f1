"""Kuadrant RLS v1 protocol: kuadrantrls.proto and its generated modules (see generate.py)."""
