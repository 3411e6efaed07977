"""Test-time methods, one per file: sampling baselines, LatentSeek, LatentEvolve."""
