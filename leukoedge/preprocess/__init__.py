"""Frame preprocessing: cpu.py is the reference (numpy + OpenCV); cuda.py runs the same steps on a GPU."""
