// One synthetic image as data: a plain background and 1–4 coloured shapes, laid out so
// that every question asked about it has exactly one right answer (shapes never overlap,
// stay whole inside the image, and are large enough to read at 32×32 px).
#pragma once
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>

#include <string>
#include <vector>

#include "rng.h"

namespace vchat::synth {

enum class ShapeType { circle = 0, square = 1, triangle = 2 };
constexpr int kShapeTypes = 3;
constexpr int kMaxShapes = 4;
const char* type_name(ShapeType t);  // "circle", "square", "triangle"

// The named palette. Saturated, well-separated hues so a colour stays nameable after a
// resize to 32 px; white and yellow only on dark backgrounds (on a light one they vanish).
struct Colour {
  const char* name;
  int r, g, b;
  bool on_light;  // readable on a light background
};
const std::vector<Colour>& palette();
int palette_size();

struct Shape {
  ShapeType type;
  int colour;  // index into palette()
  int x, y;    // centre, pixels from the top-left corner
  int size;    // bounding-box side: the shape covers [x - size/2, x + size/2] (same for y)
};

struct Image {
  bool dark = true;  // dark or light background
  int gray = 0;      // the background's gray level
  std::vector<Shape> shapes;
};

// What a task needs from one shape before layout; -1 fields are drawn at random.
// ex_type/ex_colour exclude a combination from the random draw: (t, -1) excludes every
// shape of type t, (t, c) only the c-coloured t (-1 in both: nothing excluded).
struct ShapeSpec {
  int type = -1;
  int colour = -1;
  int ex_type = -1;
  int ex_colour = -1;
};

struct ImageSpec {
  std::vector<ShapeSpec> shapes;  // 1..kMaxShapes
  bool distinct_columns = false;  // each shape in its own column (for "on the left")
  bool force_dark = false;        // e.g. a question naming white must not be answerable from the background
};

// Colours allowed on this background (indices into palette()).
std::vector<int> colours_for(bool dark);

// Draws the background, the open fields of each spec and the layout.
Image make_image(Rng& rng, int image_size, const ImageSpec& spec);

// Renders to an 8-bit BGR image (OpenCV's channel order). Antialiasing only from 64 px:
// below that it smears the few pixels a shape has into the background.
cv::Mat render(const Image& image, int image_size);

// [{"type": "circle", "color": "red", "x": 12, "y": 20, "size": 10}, ...]
nlohmann::ordered_json to_json(const Image& image);

}  // namespace vchat::synth
