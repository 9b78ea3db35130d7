"""Import the ddpm package from this checkout's src/, ahead of any installed copy.

DVC runs queued and --temp experiments in a copy of the repository: their stages must run the
code committed with them, not the package installed from the user's working tree.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
