"""The worker side: runs in its own Python environment with torch and diffsynth."""
