"""Data in and out: load rows as conversations, tokenize them, write the trainer-ready output."""
