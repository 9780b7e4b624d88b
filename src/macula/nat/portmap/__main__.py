"""`python -m macula.nat.portmap`: see macula.nat.portmap.tool."""

from __future__ import annotations

import sys

from .tool import main

sys.exit(main())
