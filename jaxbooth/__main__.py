"""`python -m jaxbooth ...` (also what `accelerate launch -m jaxbooth train ...` runs)."""

import sys

from jaxbooth.cli import main

sys.exit(main())
