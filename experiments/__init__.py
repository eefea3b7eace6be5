"""absl binaries, one per stage, plus the pipeline that chains them."""
