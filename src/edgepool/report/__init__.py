"""Reports: machine description, tables and plots of measured and predicted results."""
