"""The benchmark behind `bertopt bench`."""
