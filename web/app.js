// Wardroom web client.
