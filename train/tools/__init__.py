"""Command-line tools that make data for the trainer: `pack_rec` (ImageFolder -> RecordIO)
and `make_bin` (verification pairs -> insightface .bin)."""
