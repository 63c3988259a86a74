"""The local engine: Spark Connect + Delta, its notebook runtime and the demo data tool."""
