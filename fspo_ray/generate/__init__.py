"""Data generation: personas × questions → answers written for each persona → a judge → labelled pairs.

An inference stage beside evaluation: it runs the project's engines and judge as Ray Data batch
inference, and writes canonical pairs that training reads.
"""
