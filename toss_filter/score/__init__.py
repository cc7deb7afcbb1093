"""Per-token NLL scoring of response tokens under the two reference models."""
