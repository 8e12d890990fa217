"""Speed and memory benchmarks (not tests): each reports ratios against a reference timed in the same run."""
