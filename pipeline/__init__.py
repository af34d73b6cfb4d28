"""retune library: plain, typed, orchestrator-free pipeline steps."""
