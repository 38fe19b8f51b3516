"""recaption: turn web image shards into a densely recaptioned training corpus."""
