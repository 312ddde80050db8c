"""`fedtune simulate`: many virtual clients on Ray, through the same code path as real agents."""
