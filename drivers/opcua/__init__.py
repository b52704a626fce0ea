"""OPC-UA driver (asyncua)."""
