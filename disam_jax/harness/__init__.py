"""DomainBed-style domain-generalization harness (needs the `harness` extra)."""
