"""Built-in ltmpctl compressors (installed as `ltmpctl_plugins`), registered through entry points like any plugin."""
