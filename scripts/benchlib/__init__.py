"""edgekb's benchmarks: each module measures one path against the raw library it wraps."""
