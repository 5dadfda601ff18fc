"""The plugin kit: what plugins share besides ops/ and third-party libraries. Plugins import
from here, never from app/ or registry/; the app may import it too.

- `markup`: user-controlled text made safe for Markdown and HTML (names, data rows, errors).
"""
