"""Control Adapters and the per-family model facts they (and the engine and export tools) rely on."""
