"""The foundation every layer may use: errors users see, quantities with units, atomic file writes."""
