"""LiDAR 3D object detection (issue 13): point clouds and labelled 3D boxes in (KITTI, nuScenes), boxes
in the LiDAR frame as (x, y, z of the centre, dx, dy, dz, heading); readers in `io`, box geometry
(rotated IoU, NMS, points in boxes) in `boxes`, voxelization in models/voxelize.py."""
