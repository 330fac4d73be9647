#include "scene.h"

#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <stdexcept>

namespace vchat::synth {

const char* type_name(ShapeType t) {
  switch (t) {
    case ShapeType::circle: return "circle";
    case ShapeType::square: return "square";
    case ShapeType::triangle: return "triangle";
  }
  return "?";
}

const std::vector<Colour>& palette() {
  // Hues at least ~60° apart (purple is pushed to magenta, away from blue); blue is
  // lightened so it still stands out on a near-black background.
  static const std::vector<Colour> kPalette = {
      {"red", 255, 0, 0, true},      {"green", 0, 200, 0, true},       {"blue", 30, 60, 255, true},
      {"yellow", 255, 230, 0, false}, {"white", 255, 255, 255, false}, {"purple", 200, 0, 200, true},
  };
  return kPalette;
}

int palette_size() { return static_cast<int>(palette().size()); }

std::vector<int> colours_for(bool dark) {
  std::vector<int> out;
  for (int c = 0; c < palette_size(); ++c)
    if (dark || palette()[c].on_light) out.push_back(c);
  return out;
}

namespace {

bool excluded(const ShapeSpec& s, int type, int colour) {
  if (s.ex_type < 0 && s.ex_colour < 0) return false;
  return (s.ex_type < 0 || s.ex_type == type) && (s.ex_colour < 0 || s.ex_colour == colour);
}

// Pixel span [lo, hi] of cell i of g along an axis of n pixels.
std::pair<int, int> cell_span(int i, int g, int n) { return {i * n / g, (i + 1) * n / g - 1}; }

}  // namespace

Image make_image(Rng& rng, int image_size, const ImageSpec& spec) {
  const int n = static_cast<int>(spec.shapes.size());
  if (n < 1 || n > kMaxShapes) throw std::logic_error("make_image: 1.." + std::to_string(kMaxShapes) + " shapes");

  Image img;
  bool needs_dark = spec.force_dark;
  for (const ShapeSpec& s : spec.shapes)
    if (s.colour >= 0 && !palette()[s.colour].on_light) needs_dark = true;
  img.dark = needs_dark || rng.chance(0.5);
  img.gray = img.dark ? rng.uniform(0, 40) : rng.uniform(205, 245);
  const std::vector<int> colours = colours_for(img.dark);

  for (const ShapeSpec& s : spec.shapes) {
    Shape shape{};
    // Rejection over a palette of >= 4 colours x 3 types: an exclusion removes at most
    // one type or one combination, so this ends quickly; the bound only catches bad specs.
    for (int tries = 0;; ++tries) {
      if (tries == 1000) throw std::logic_error("make_image: unsatisfiable shape spec");
      const int type = s.type >= 0 ? s.type : rng.uniform(0, kShapeTypes - 1);
      const int colour = s.colour >= 0 ? s.colour : rng.pick(colours);
      if (excluded(s, type, colour)) continue;
      shape.type = static_cast<ShapeType>(type);
      shape.colour = colour;
      break;
    }
    img.shapes.push_back(shape);
  }

  // Layout on a g x g grid, one shape per cell, so shapes never overlap and counting is
  // unambiguous. A lone shape gets the whole image; 3x3 from 64 px gives more positions.
  const int g = n == 1 ? 1 : (image_size >= 64 ? 3 : 2);
  std::vector<std::pair<int, int>> cells;  // (column, row)
  if (spec.distinct_columns) {
    if (n > g) throw std::logic_error("make_image: more shapes than columns");
    std::vector<int> cols(g);
    for (int i = 0; i < g; ++i) cols[i] = i;
    rng.shuffle(cols);
    for (int i = 0; i < n; ++i) cells.emplace_back(cols[i], rng.uniform(0, g - 1));
  } else {
    for (int c = 0; c < g; ++c)
      for (int r = 0; r < g; ++r) cells.emplace_back(c, r);
    rng.shuffle(cells);
    cells.resize(n);
  }

  // Radius as a fraction of the cell: large at small sizes (a 32 px image must keep ~10 px
  // shapes to stay legible), more varied from 64 px. One pixel of margin keeps neighbours
  // in adjacent cells from touching.
  const double lo_frac = image_size < 64 ? 0.30 : 0.18, hi_frac = 0.42;
  for (int i = 0; i < n; ++i) {
    const auto [x0, x1] = cell_span(cells[i].first, g, image_size);
    const auto [y0, y1] = cell_span(cells[i].second, g, image_size);
    const int extent = std::min(x1 - x0 + 1, y1 - y0 + 1);
    const int r_lo = std::max(2, static_cast<int>(extent * lo_frac));
    const int r_hi = std::max(r_lo, static_cast<int>(extent * hi_frac));
    const int r = rng.uniform(r_lo, r_hi);
    Shape& s = img.shapes[i];
    s.size = 2 * r;
    s.x = rng.uniform(x0 + r + 1, x1 - r - 1);
    s.y = rng.uniform(y0 + r + 1, y1 - r - 1);
  }
  return img;
}

cv::Mat render(const Image& image, int image_size) {
  cv::Mat m(image_size, image_size, CV_8UC3, cv::Scalar(image.gray, image.gray, image.gray));
  const int line = image_size >= 64 ? cv::LINE_AA : cv::LINE_8;
  for (const Shape& s : image.shapes) {
    const Colour& c = palette()[s.colour];
    const cv::Scalar bgr(c.b, c.g, c.r);
    const int r = s.size / 2;
    switch (s.type) {
      case ShapeType::circle:
        cv::circle(m, {s.x, s.y}, r, bgr, cv::FILLED, line);
        break;
      case ShapeType::square:
        cv::rectangle(m, cv::Point(s.x - r, s.y - r), cv::Point(s.x + r, s.y + r), bgr, cv::FILLED, line);
        break;
      case ShapeType::triangle: {
        // Apex up, base at the bottom of the bounding box; the centre pixel is inside.
        const std::vector<cv::Point> pts = {{s.x, s.y - r}, {s.x - r, s.y + r}, {s.x + r, s.y + r}};
        cv::fillPoly(m, std::vector<std::vector<cv::Point>>{pts}, bgr, line);
        break;
      }
    }
  }
  return m;
}

nlohmann::ordered_json to_json(const Image& image) {
  nlohmann::ordered_json shapes = nlohmann::ordered_json::array();
  for (const Shape& s : image.shapes) {
    shapes.push_back({{"type", type_name(s.type)},
                      {"color", palette()[s.colour].name},
                      {"x", s.x},
                      {"y", s.y},
                      {"size", s.size}});
  }
  return shapes;
}

}  // namespace vchat::synth
