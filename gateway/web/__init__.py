"""The engineers' web desk (SPEC §11): `s4e-gateway web`, a process of its own."""
