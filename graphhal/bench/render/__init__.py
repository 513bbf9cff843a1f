"""A bench result for people and machines: the terminal table, the JSON file and the plot."""
