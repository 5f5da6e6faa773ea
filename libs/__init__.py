"""Infrastructure shared by every Corral service. No domain types of any one context live here."""
