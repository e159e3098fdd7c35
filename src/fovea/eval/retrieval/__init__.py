"""Instance retrieval (revisited Oxford / Paris, a user's own query / database folders) and copy detection."""
