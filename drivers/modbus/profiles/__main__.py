"""`python -m drivers.modbus.profiles`: print the requests-per-poll table of docs/profiles.md."""

from drivers.modbus.profiles import requests_table

print(requests_table())
