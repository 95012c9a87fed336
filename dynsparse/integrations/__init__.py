"""Host integrations: tables that map host classes to gated classes and branch layouts."""
