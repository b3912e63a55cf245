"""The lean `synapse-router` launcher and the `--processes N` supervisor."""
