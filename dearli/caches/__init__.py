"""Foundation-model caches on Ray Data: SAM masks and CLIP features written to Parquet."""
