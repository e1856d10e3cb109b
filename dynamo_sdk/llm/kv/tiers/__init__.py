"""The KV cache's tiers below the device: host memory (G2), local disk (G3), shared storage (G4).

`stack.TierStack` runs them for one engine (the module docstring has the whole design); the
other modules are its parts, each usable on its own: `keys` (what identifies a block across
processes), `record` (a block's self-checking bytes), `store` (the interface of a tier that
keeps bytes, and where a storage vendor plugs in), `host`, `disk`, `shared` (the tiers),
`stats` (what they report). `docs/kv_tiers.md` is the user's guide.
"""
