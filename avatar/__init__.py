"""The synchronous engine: portrait preparation, media I/O and rendering. No asyncio, devices or network."""
